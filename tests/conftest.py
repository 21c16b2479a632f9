"""Test fixtures: a real PostgreSQL database built by the migrations, a real Redis, and Stripe replaced
at one seam: the SDK's StripeClient, swapped for OfflineStripe below. Nothing else about Stripe is faked
anywhere in the suite; `pytest --stripe-live` leaves the real client in place."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from email import message_from_bytes
from email import policy as email_policy
from email.message import EmailMessage
from typing import Any
from urllib.parse import urlsplit

import psycopg2
import pytest
import redis
import stripe
from aiosmtpd.controller import Controller
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from app import create_app
from app.extensions import db
from app.services import queue
from app.services.billing_service import STRIPE_API_VERSION
from config import TestConfig, normalise_database_url

pytest_plugins = ["tests.live_support"]
OFFLINE_SECRET_KEY = "sk_test_offline_suite_51Hx0000000000000"
OFFLINE_WEBHOOK_SECRET = "whsec_offline_suite_0123456789abcdef"
TABLES = (
    "outbox_delivery",
    "domain_event",
    "organization_addon",
    "user_account",
    "pending_signup",
    "stripe_event",
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


def offline_overrides() -> dict[str, Any]:
    return {
        "STRIPE_SECRET_KEY": OFFLINE_SECRET_KEY,
        "STRIPE_WEBHOOK_SECRET": OFFLINE_WEBHOOK_SECRET,
        "STRIPE_API_BASE": "",
        "APP_BASE_URL": "http://localhost",
    }


@pytest.fixture(scope="session")
def cleaner(database_url: str, redis_url: str) -> Iterator[Callable[[], None]]:
    """Empties every table and the test Redis database; one connection for the whole run."""
    engine = create_engine(database_url, poolclass=NullPool)
    redis_client = redis.Redis.from_url(redis_url)

    def clean() -> None:
        with engine.begin() as connection:
            connection.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
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

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            if self.refusals:
                self.refusals -= 1
                return "451 Requested action aborted: try again later"
            message = message_from_bytes(envelope.content, policy=email_policy.default)
            assert isinstance(message, EmailMessage)
            self.messages.append(message)
        return "250 Message accepted for delivery"

    def refuse_next(self, count: int = 1) -> None:
        """The next ``count`` messages are refused with a temporary error (451)."""
        self.refusals = count

    def to(self, address: str) -> list[EmailMessage]:
        return [message for message in self.messages if address in str(message["To"])]

    def clear(self) -> None:
        with self.lock:
            self.messages.clear()
            self.refusals = 0


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
    way `flask billing worker` runs them, and return when none is left."""
    queue.run_pending_jobs(app, queues=queues)


@pytest.fixture
def make_app(cleaner: Callable[[], None], smtp_server: SmtpSink) -> Iterator[Callable[..., Flask]]:
    """Build an app on the test database and Redis, from a clean slate; overrides go on top."""
    apps: list[Flask] = []
    cleaner()

    def build(**overrides: Any) -> Flask:
        mail = {"MAIL_SERVER": "127.0.0.1", "MAIL_PORT": smtp_server.port}
        app = create_app(_test_config(), **{**offline_overrides(), **mail, **overrides})
        apps.append(app)
        return app

    yield build
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


# --- Stripe: the one seam ----------------------------------------------------------------------


def sign_stripe_payload(payload: bytes, secret: str, timestamp: int | None = None) -> str:
    """A Stripe-Signature header, computed the way Stripe does: HMAC-SHA256 over "{t}.{body}"."""
    timestamp = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


_ids = itertools.count(1)


def stripe_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:14]}{next(_ids)}"


class OfflineStripe:
    """An in-memory Stripe account behind the StripeClient interface this product calls
    (client.v1.prices / checkout.sessions / subscriptions / billing_portal.sessions). It keeps state so
    reads agree with writes, honours idempotency keys, records every call, and builds the events
    Stripe would send. Tests also use it to act as the customer (pay a checkout) and as Stripe's
    dashboard (change a subscription)."""

    def __init__(self, catalogue: dict[str, str]) -> None:
        self.prices = {
            lookup_key: {
                "id": f"price_{lookup_key}",
                "object": "price",
                "lookup_key": lookup_key,
                "active": True,
                "unit_amount": 1000,
                "currency": "usd",
                "recurring": {"interval": "month", "interval_count": 1},
            }
            for lookup_key in catalogue.values()
        }
        self.sessions: dict[str, dict[str, Any]] = {}
        self.subscriptions: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.idempotent: dict[str, Any] = {}
        self.failures: dict[str, Exception] = {}
        self.client_kwargs: dict[str, Any] = {}
        self.lock = threading.Lock()
        self.v1 = _Namespace(
            prices=_Namespace(list=self._method("prices.list", self._list_prices)),
            checkout=_Namespace(
                sessions=_Namespace(
                    create=self._method("checkout.sessions.create", self._create_session),
                    retrieve=self._method("checkout.sessions.retrieve", self._retrieve_session),
                    expire=self._method("checkout.sessions.expire", self._expire_session),
                )
            ),
            subscriptions=_Namespace(
                retrieve=self._method("subscriptions.retrieve", self._retrieve_subscription),
                update=self._method("subscriptions.update", self._update_subscription),
                cancel=self._method("subscriptions.cancel", self._cancel_subscription),
            ),
            billing_portal=_Namespace(
                sessions=_Namespace(create=self._method("billing_portal.sessions.create", self._create_portal_session))
            ),
        )

    # The seam: `stripe.StripeClient(...)` returns this object.
    def client_factory(self, api_key: str, **kwargs: Any) -> OfflineStripe:
        self.client_kwargs = {"api_key": api_key, **kwargs}
        return self

    def fail_next(self, method: str, kind: str = "connection") -> None:
        """The next call to method fails as Stripe can: "connection" (network), "server" (5xx) or "missing"."""
        self.failures[method] = {
            "connection": stripe.APIConnectionError("Could not connect to Stripe (offline suite)."),
            "server": stripe.APIError("Stripe had a problem (offline suite).", http_status=500),
            "missing": self._missing("object", "unknown"),
        }[kind]

    def calls_to(self, method: str) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
        return [(args, kwargs) for name, args, kwargs in self.calls if name == method]

    def _method(self, name: str, implementation: Callable[..., dict[str, Any]]) -> Callable[..., Any]:
        def call(*args: Any, params: dict[str, Any] | None = None, options: dict[str, Any] | None = None) -> Any:
            with self.lock:
                self.calls.append((name, args, {"params": params, "options": options}))
                if name in self.failures:
                    raise self.failures.pop(name)
                key = (options or {}).get("idempotency_key")
                if key and (name, key) in self.idempotent:
                    return self.idempotent[(name, key)]
                result = stripe.StripeObject.construct_from(implementation(*args, **(params or {})), OFFLINE_SECRET_KEY)
                if key:
                    self.idempotent[(name, key)] = result
                return result

        return call

    @staticmethod
    def _missing(kind: str, object_id: str) -> stripe.InvalidRequestError:
        return stripe.InvalidRequestError(f"No such {kind}: '{object_id}'", "id", code="resource_missing")

    def _list_prices(self, lookup_keys: list[str], **_: Any) -> dict[str, Any]:
        data = [self.prices[key] for key in lookup_keys if key in self.prices]
        return {"object": "list", "data": data, "has_more": False, "url": "/v1/prices"}

    def _create_session(self, **params: Any) -> dict[str, Any]:
        session_id = stripe_id("cs_test")
        price_ids = {price["id"] for price in self.prices.values()}
        for item in params["line_items"]:
            if item["price"] not in price_ids:
                raise stripe.InvalidRequestError(f"No such price: '{item['price']}'", "line_items[0][price]")
        self.sessions[session_id] = {
            "id": session_id,
            "object": "checkout.session",
            "mode": params["mode"],
            "status": "open",
            "payment_status": "unpaid",
            "url": f"https://checkout.stripe.test/c/pay/{session_id}",
            "customer": params.get("customer"),
            "customer_email": params.get("customer_email"),
            "client_reference_id": params.get("client_reference_id"),
            "metadata": dict(params.get("metadata") or {}),
            "subscription": None,
            "invoice": None,
            "success_url": params["success_url"],
            "cancel_url": params["cancel_url"],
            "expires_at": params.get("expires_at"),
            "created": int(time.time()),
            "livemode": False,
            "params": params,
        }
        return self._public_session(session_id)

    def _public_session(self, session_id: str, expand: list[str] | None = None) -> dict[str, Any]:
        session = {key: value for key, value in self.sessions[session_id].items() if key != "params"}
        if "subscription" in (expand or []) and session["subscription"]:
            session["subscription"] = json.loads(json.dumps(self.subscriptions[session["subscription"]]))
        return session

    def _retrieve_session(self, session_id: str, expand: list[str] | None = None) -> dict[str, Any]:
        if session_id not in self.sessions:
            raise self._missing("checkout.session", session_id)
        return self._public_session(session_id, expand)

    def _expire_session(self, session_id: str, **_: Any) -> dict[str, Any]:
        session = self.sessions[session_id]
        if session["status"] != "open":
            raise stripe.InvalidRequestError("Only open sessions can be expired.", None)
        session.update(status="expired", url=None)
        return self._public_session(session_id)

    def _retrieve_subscription(self, subscription_id: str, **_: Any) -> dict[str, Any]:
        if subscription_id not in self.subscriptions:
            raise self._missing("subscription", subscription_id)
        return json.loads(json.dumps(self.subscriptions[subscription_id]))

    def _update_subscription(self, subscription_id: str, **params: Any) -> dict[str, Any]:
        subscription = self.subscriptions[subscription_id]
        if subscription["status"] == "canceled":
            raise stripe.InvalidRequestError("A canceled subscription can only update its cancellation_details.", None)
        if "cancel_at_period_end" in params:
            subscription["cancel_at_period_end"] = bool(params["cancel_at_period_end"])
        return self._retrieve_subscription(subscription_id)

    def _cancel_subscription(self, subscription_id: str, **_: Any) -> dict[str, Any]:
        subscription = self.subscriptions[subscription_id]
        if subscription["status"] == "canceled":
            raise stripe.InvalidRequestError("This subscription has already been canceled.", None)
        now = int(time.time())
        subscription.update(status="canceled", canceled_at=now, ended_at=now, cancel_at_period_end=False)
        return self._retrieve_subscription(subscription_id)

    def _create_portal_session(self, customer: str, return_url: str, **_: Any) -> dict[str, Any]:
        portal_id = stripe_id("bps")
        return {
            "id": portal_id,
            "object": "billing_portal.session",
            "customer": customer,
            "return_url": return_url,
            "url": f"https://billing.stripe.test/p/session/{portal_id}",
        }

    # --- acting as the customer and as Stripe -----------------------------------------------------

    def pay(self, session_id: str, *, outcome: str = "paid") -> dict[str, Any]:
        """The customer completes the hosted checkout. outcome: paid, trial (no payment required) or
        async (the payment is still being confirmed). Returns the completed session."""
        with self.lock:
            session = self.sessions[session_id]
            params = session["params"]
            customer = session["customer"] or stripe_id("cus")
            subscription_id = stripe_id("sub")
            now = int(time.time())
            status = {"paid": "active", "trial": "trialing", "async": "incomplete"}[outcome]
            trial_days = (params.get("subscription_data") or {}).get("trial_period_days")
            self.subscriptions[subscription_id] = {
                "id": subscription_id,
                "object": "subscription",
                "status": status,
                "customer": customer,
                "cancel_at_period_end": False,
                "cancel_at": None,
                "canceled_at": None,
                "ended_at": None,
                "trial_end": now + 86400 * int(trial_days) if trial_days and outcome == "trial" else None,
                "metadata": dict((params.get("subscription_data") or {}).get("metadata") or {}),
                "latest_invoice": stripe_id("in"),
                "created": now,
                "livemode": False,
                "items": {
                    "object": "list",
                    "data": [
                        {
                            "id": stripe_id("si"),
                            "object": "subscription_item",
                            "price": self._price_by_id(item["price"]),
                            "quantity": item["quantity"],
                            "current_period_start": now,
                            "current_period_end": now + 30 * 86400,
                        }
                        for item in params["line_items"]
                    ],
                },
            }
            session.update(
                status="complete",
                payment_status={"paid": "paid", "trial": "no_payment_required", "async": "unpaid"}[outcome],
                customer=customer,
                subscription=subscription_id,
                invoice=self.subscriptions[subscription_id]["latest_invoice"],
                url=None,
            )
            return self._public_session(session_id)

    def settle_async_payment(self, session_id: str) -> dict[str, Any]:
        with self.lock:
            session = self.sessions[session_id]
            session["payment_status"] = "paid"
            self.subscriptions[session["subscription"]]["status"] = "active"
            return self._public_session(session_id)

    def change_subscription(self, subscription_id: str, **changes: Any) -> dict[str, Any]:
        """A change made at Stripe (dashboard, portal, renewal, dunning). Returns the new object."""
        with self.lock:
            subscription = self.subscriptions[subscription_id]
            if "lookup_keys" in changes:
                now = int(time.time())
                subscription["items"]["data"] = [
                    {
                        "id": stripe_id("si"),
                        "object": "subscription_item",
                        "price": self.prices[key],
                        "quantity": quantity,
                        "current_period_start": now,
                        "current_period_end": now + 30 * 86400,
                    }
                    for key, quantity in changes.pop("lookup_keys").items()
                ]
            subscription.update(changes)
            return json.loads(json.dumps(subscription))

    def _price_by_id(self, price_id: str) -> dict[str, Any]:
        return next(price for price in self.prices.values() if price["id"] == price_id)

    @staticmethod
    def event(
        event_type: str,
        obj: dict[str, Any],
        *,
        created: int | None = None,
        livemode: bool = False,
        event_id: str | None = None,
    ) -> dict[str, Any]:
        return {
            "id": event_id or stripe_id("evt"),
            "object": "event",
            "api_version": STRIPE_API_VERSION,
            "created": int(time.time()) if created is None else created,
            "livemode": livemode,
            "pending_webhooks": 1,
            "request": {"id": None, "idempotency_key": None},
            "type": event_type,
            "data": {"object": obj},
        }


class _Namespace:
    def __init__(self, **members: Any) -> None:
        self.__dict__.update(members)


@pytest.fixture
def offline_stripe(monkeypatch: pytest.MonkeyPatch) -> OfflineStripe:
    """Stripe, offline: the SDK's client class is replaced, so BillingService talks to OfflineStripe."""
    from app.services.plans import PlanCatalogue

    catalogue = PlanCatalogue.load(_test_config().PLAN_CATALOGUE_FILE)
    fake = OfflineStripe(
        {
            **{t.key: t.lookup_key for t in catalogue.tiers.values()},
            **{a.key: a.lookup_key for a in catalogue.addons.values()},
        }
    )
    monkeypatch.setattr(stripe, "StripeClient", fake.client_factory)
    return fake


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


PASSWORD = "correct horse battery staple"


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


def sign_up(client: FlaskClient, stripe_api: OfflineStripe, *, outcome: str = "paid", **fields: Any) -> dict[str, Any]:
    """A signup walked to a signed-in owner through the success redirect; returns the paid session."""
    session_id = checkout_session_id(start_signup(client, **fields))
    session = stripe_api.pay(session_id, outcome=outcome)
    response = client.get(f"/billing/complete-signup-from-stripe?session_id={session_id}")
    assert response.status_code == 303 and response.headers["Location"] == "/app", response.get_data(as_text=True)
    return session


def live_stripe_environment() -> dict[str, str]:
    missing = [name for name in LIVE_VARIABLES if not os.environ.get(name)]
    if missing:
        pytest.skip(
            f"--stripe-live needs {', '.join(missing)} (Stripe test-mode keys, or the offline sandbox's: see "
            "README.md 'Live mode'); STRIPE_API_BASE is optional"
        )
    return {name: os.environ[name] for name in (*LIVE_VARIABLES, "STRIPE_API_BASE") if os.environ.get(name)}
