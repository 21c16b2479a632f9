"""Proof under load and faults (issue 7, issue 12): a hundred requests racing to provision one checkout,
a worker killed in the middle of a job, and Redis going away while the app runs.

Real PostgreSQL and Redis throughout (the outage test starts a redis-server of its own so that taking
it down touches nothing else); Stripe is the suite's sandbox, slowed down where a test must catch the app
waiting on it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient

from app.services import jobs, queue
from tests.conftest import (
    OFFLINE_SECRET_KEY,
    OFFLINE_WEBHOOK_SECRET,
    PASSWORD,
    SandboxAccount,
    checkout_session_id,
    csrf_token,
    post_and_apply,
    post_webhook,
    query,
    run_jobs,
    sign_up,
    signup_form,
    start_signup,
    stripe_event,
)
from tests.live_support import wait_until

ROOT = Path(__file__).resolve().parents[1]
SIGNUP_EVENTS = ("organization.created", "user.created", "signup.completed")
REDIS_DOWN_MESSAGE = "Signing in and forms are briefly unavailable. Please try again in a minute."


def domain_event_counts(app: Flask) -> Counter[str]:
    return Counter(row.name for row in query(app, "SELECT name FROM domain_event"))


def admin_connection(database_url: str) -> Any:
    """A connection of the test's own, outside the app's pool."""
    connection = psycopg2.connect(
        database_url.replace("postgresql+psycopg2://", "postgresql://"), application_name="issue7-tests"
    )
    connection.autocommit = True
    return connection


def connection_budget(database_url: str) -> int:
    """How many connections the race may hold: half of what PostgreSQL has free right now (other test
    runs and tools share the server), at least 10 and at most 100."""
    connection = admin_connection(database_url)
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT current_setting('max_connections')::int"
                " - current_setting('superuser_reserved_connections')::int"
                " - (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')"
            )
            free = int(cursor.fetchone()[0])
    finally:
        connection.close()
    return max(10, min(100, free // 2))


def run_together(tasks: list[Callable[[], Any]]) -> list[Any]:
    """Run every task in its own thread, released at once by a barrier; returns their results in order.
    An exception in a thread is returned as its result, so it fails the test instead of vanishing."""
    barrier = threading.Barrier(len(tasks))
    results: list[Any] = [None] * len(tasks)

    def run(index: int) -> None:
        try:
            barrier.wait()
            results[index] = tasks[index]()
        except BaseException as exc:
            results[index] = exc

    threads = [threading.Thread(target=run, args=(n,)) for n in range(len(tasks))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


# --- A hundred arrivals for one checkout ----------------------------------------------------------


def test_fifty_webhooks_and_fifty_redirects_at_once_provision_exactly_once(
    make_app: Callable[..., Flask], offline_stripe: SandboxAccount, database_url: str
) -> None:
    budget = connection_budget(database_url)
    app = make_app(
        SQLALCHEMY_ENGINE_OPTIONS={
            "pool_pre_ping": True,
            "pool_size": budget,
            "max_overflow": 0,
            # Threads beyond the budget queue for a connection instead of failing.
            "pool_timeout": 120,
            "connect_args": {"connect_timeout": 5, "application_name": "billing-web"},
        },
        CHECKOUT_RETURN_RATE_LIMIT="1000/minute",
    )
    owner = app.test_client()
    session_id = checkout_session_id(start_signup(owner))
    completed = stripe_event("checkout.session.completed", offline_stripe.pay(session_id))
    url = f"/billing/complete-signup-from-stripe?session_id={session_id}"

    def webhook(client: FlaskClient) -> Callable[[], tuple[str, int, str | None]]:
        def deliver() -> tuple[str, int, str | None]:
            response = post_webhook(client, completed)
            return "webhook", response.status_code, None

        return deliver

    def redirect(client: FlaskClient) -> Callable[[], tuple[str, int, str | None]]:
        def arrive() -> tuple[str, int, str | None]:
            response = client.get(url)
            return "redirect", response.status_code, response.headers.get("Location")

        return arrive

    # Each thread has its own client (its own cookie jar); one redirect is the browser that signed up.
    tasks = [webhook(app.test_client()) for _ in range(50)]
    tasks += [redirect(owner)] + [redirect(app.test_client()) for _ in range(49)]
    results = run_together(tasks)

    errors = [result for result in results if isinstance(result, BaseException)]
    assert errors == []
    assert {status for kind, status, _ in results if kind == "webhook"} == {200}
    run_jobs(app)  # the worker applies the one stored event
    redirects = [(status, location) for kind, status, location in results if kind == "redirect"]
    assert len(redirects) == 50 and {status for status, _ in redirects} == {303}
    # Only the browser that started the signup is signed in; every other one is asked to sign in.
    assert Counter(location for _, location in redirects) == {"/app": 1, "/auth/login": 49}
    assert "Analytical Engines" in owner.get("/app").get_data(as_text=True)

    assert len(query(app, "SELECT id FROM organization")) == 1
    [owner_row] = query(app, "SELECT * FROM user_account")
    assert (owner_row.email, owner_row.role) == ("ada@example.com", "owner")
    events = domain_event_counts(app)
    assert [events[name] for name in SIGNUP_EVENTS] == [1, 1, 1]
    assert [(row.status, row.attempts) for row in query(app, "SELECT * FROM stripe_event")] == [("processed", 1)]
    [pending] = query(app, "SELECT * FROM pending_signup")
    assert pending.status == "completed"
    # No lock is held while Stripe is read: redirects that overlap the first provisioning each read it
    # once; those after its commit find it done without asking. The worker reads the checkout once more
    # to apply the stored event, and finds it provisioned.
    reads = offline_stripe.calls_to("checkout.sessions.retrieve") + offline_stripe.calls_to("subscriptions.retrieve")
    assert 2 <= len(reads) <= 52


# --- A worker dies in the middle of a job -------------------------------------------------------------


def test_a_worker_killed_mid_job_leaves_nothing_half_applied_and_the_job_runs_again(
    app: Flask, offline_stripe: SandboxAccount, database_url: str, smtp_server: Any
) -> None:
    owner = app.test_client()
    session_id = checkout_session_id(start_signup(owner))
    completed = stripe_event("checkout.session.completed", offline_stripe.pay(session_id))
    # The request stores the event and its job, and answers; nothing is applied yet.
    stored = post_webhook(app.test_client(), completed)
    assert stored.status_code == 200 and stored.get_json() == {"received": True}
    # A real worker process (`flask billing worker`) takes the job; Stripe is slow, so it is mid-job
    # (reading the checkout) when it is killed with SIGKILL: no clean-up, no rollback of its own.
    offline_stripe.set_latency(3)
    environment = {
        **os.environ,
        "APP_ENV": "test",
        "FLASK_APP": "wsgi.py",
        "TEST_DATABASE_URL": database_url,
        "STRIPE_SECRET_KEY": OFFLINE_SECRET_KEY,
        "STRIPE_WEBHOOK_SECRET": OFFLINE_WEBHOOK_SECRET,
        "STRIPE_API_BASE": offline_stripe.url,
        "STRIPE_MAX_NETWORK_RETRIES": "0",
        "MAIL_SERVER": "127.0.0.1",
        "MAIL_PORT": str(smtp_server.port),
    }
    worker = subprocess.Popen(
        [sys.executable, "-m", "flask", "billing", "worker", "--queue", "webhooks", "--concurrency", "1"],
        cwd=ROOT,
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(
            lambda: offline_stripe.calls_to("checkout.sessions.retrieve"), 60, "the worker never asked Stripe", 0.05
        )
        worker.send_signal(signal.SIGKILL)
        assert worker.wait(10) == -signal.SIGKILL
    finally:
        if worker.poll() is None:
            worker.kill()
        offline_stripe.set_latency(0)

    # Nothing of the job survived: no account, no signup events, the signup still open, the event still
    # waiting, and its job left "doing" under a dead worker.
    assert query(app, "SELECT id FROM organization") == []
    assert query(app, "SELECT id FROM user_account") == []
    assert not any(domain_event_counts(app)[name] for name in SIGNUP_EVENTS)
    assert [row.status for row in query(app, "SELECT status FROM pending_signup")] == ["pending"]
    assert [row.status for row in query(app, "SELECT status FROM stripe_event")] == ["pending"]
    [job] = query(app, "SELECT status FROM procrastinate_jobs WHERE task_name = 'webhooks:apply'")
    assert job.status == "doing"

    # The dead worker's heartbeat stops; the stalled job is queued again and applies the event in full.
    time.sleep(1.5)
    assert jobs.requeue_stalled_jobs_now(queue.job_app(app), seconds_since_heartbeat=1) == 1
    run_jobs(app)
    [organization] = query(app, "SELECT * FROM organization")
    assert organization.name == "Analytical Engines" and organization.billing_status == "active"
    [event_row] = query(app, "SELECT * FROM stripe_event")
    assert (event_row.event_id, event_row.status, event_row.attempts) == (completed["id"], "processed", 1)
    events = domain_event_counts(app)
    assert [events[name] for name in SIGNUP_EVENTS] == [1, 1, 1]
    [job] = query(app, "SELECT status FROM procrastinate_jobs WHERE task_name = 'webhooks:apply'")
    assert job.status == "succeeded"
    # And the customer's browser, arriving afterwards, is signed in to the account the worker made.
    landing = owner.get(f"/billing/complete-signup-from-stripe?session_id={session_id}")
    assert landing.status_code == 303 and landing.headers["Location"] == "/app"


# --- Redis goes away while the app runs ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """A redis-server of this test's own, so that stopping it disturbs nobody. It saves to its directory
    when stopped and loads from it when started again, as a restarted production Redis would."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed"
        self.process = subprocess.Popen(  # noqa: S603 (a fixed argument list)
            [
                binary,
                *("--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory)),
                *("--dbfilename", "dump.rdb", "--save", "", "--appendonly", "no"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        for _ in range(200):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if self.process.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self.process.returncode}") from None
                time.sleep(0.05)
        raise RuntimeError("redis-server did not answer within 10 seconds")

    def stop(self) -> None:
        assert self.process is not None
        redis.Redis.from_url(self.url).shutdown(save=True)
        self.process.wait(10)
        self.process = None

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.kill()


def assert_unavailable_page(response: Any) -> None:
    page = response.get_data(as_text=True)
    assert response.status_code == 503, page
    assert response.mimetype == "text/html"
    assert REDIS_DOWN_MESSAGE in page and "Temporarily unavailable" in page
    assert "Traceback" not in page and "ConnectionError" not in page and "redis" not in page.lower()


def test_redis_going_away_stops_forms_with_a_clear_page_but_never_webhooks(
    make_app: Callable[..., Flask],
    offline_stripe: SandboxAccount,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = redis_server.url
    # REDIS_URL feeds the session client (register_extensions); the cache and the limiter name it too.
    # TESTING re-raises errors that escape the view (saving the session is one) instead of answering
    # them; production does not, so neither does this app.
    app = make_app(REDIS_URL=url, CACHE_REDIS_URL=url, RATELIMIT_STORAGE_URI=url, PROPAGATE_EXCEPTIONS=False)
    assert app.extensions["redis"].connection_pool.connection_kwargs["port"] == redis_server.port

    owner = app.test_client()
    sign_up(owner, offline_stripe)
    assert owner.get("/app").status_code == 200
    assert redis.Redis.from_url(url).keys("session:*")  # the sessions really live on this server
    # A second customer pays; Stripe's webhook for it will arrive during the outage.
    second = app.test_client()
    paid = offline_stripe.pay(
        checkout_session_id(start_signup(second, email="grace@example.com", organization_name="Hopper Compilers"))
    )
    completed = stripe_event("checkout.session.completed", paid)
    # A form fetched before the outage and submitted during it.
    pending_login = app.test_client()
    login_token = csrf_token(pending_login, "/auth/login")
    pending_signup = app.test_client()
    signup_fields = signup_form(pending_signup, email="linus@example.com", organization_name="Torvalds Kernels")

    redis_server.stop()
    caplog.clear()

    # Webhooks need no Redis: received, applied and recorded, without so much as a Redis error.
    response = post_and_apply(app.test_client(), completed)
    assert response.status_code == 200 and response.get_json() == {"received": True}
    assert not [record for record in caplog.records if record.levelname == "ERROR"]
    assert sorted(row.name for row in query(app, "SELECT name FROM organization")) == [
        "Analytical Engines",
        "Hopper Compilers",
    ]
    assert [row.status for row in query(app, "SELECT status FROM stripe_event")] == ["processed"]

    # Every page that needs a session answers the clear 503 page.
    assert_unavailable_page(app.test_client().get("/auth/signup"))
    assert_unavailable_page(pending_signup.post("/auth/signup", data=signup_fields))
    assert_unavailable_page(app.test_client().get("/auth/login"))
    assert_unavailable_page(
        pending_login.post(
            "/auth/login", data={"csrf_token": login_token, "email": "ada@example.com", "password": PASSWORD}
        )
    )
    assert_unavailable_page(owner.get("/app"))
    assert_unavailable_page(owner.get("/billing/"))
    assert query(app, "SELECT id FROM pending_signup WHERE email = 'linus@example.com'") == []
    assert app.test_client().get("/readyz").status_code == 503
    assert app.test_client().get("/healthz").status_code == 200
    # Each page failed once, cleanly: the error page itself never tried Redis again.
    messages = [record.getMessage() for record in caplog.records]
    assert messages.count("Redis unavailable: ConnectionError") == 6
    assert not [message for message in messages if "finalizing failed" in message]

    redis_server.start()  # same port, same data; the app is not rebuilt

    # The signed-in session survived the restart, and everything works again.
    home = owner.get("/app")
    assert home.status_code == 200 and "Analytical Engines" in home.get_data(as_text=True)
    assert app.test_client().get("/readyz").status_code == 200
    assert app.test_client().get("/auth/signup").status_code == 200
    new_signup = app.test_client()
    assert start_signup(new_signup, email="linus@example.com", organization_name="Torvalds Kernels").status_code == 303
    grace = app.test_client()
    signed_in = grace.post(
        "/auth/login",
        data={"csrf_token": csrf_token(grace, "/auth/login"), "email": "grace@example.com", "password": PASSWORD},
    )
    assert signed_in.status_code == 303 and signed_in.headers["Location"] == "/app"
    assert "Hopper Compilers" in grace.get("/app").get_data(as_text=True)
    later = stripe_event("invoice.paid", {"id": "in_after", "customer": paid["customer"]})
    assert post_webhook(app.test_client(), later).status_code == 200
