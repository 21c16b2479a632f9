"""PostgreSQL restarts under traffic, and not one request fails (app/database.py).

This test restarts the real PostgreSQL server the suite runs on (as root, with pg_ctlcluster), so every
other database session on that server is cut: it takes a few seconds. Set
LEDGERLINE_SHARED_POSTGRES=1 to leave it out on a machine where others' test runs share the server
(CI runs alone, and runs it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from flask import Flask

from tests.conftest import PASSWORD, SandboxAccount, csrf_token, post_webhook, query, sign_up, stripe_event

# Cutting every connection or restarting the server would also hit the other parallel workers' tests.
pytestmark = pytest.mark.serial


def restart_postgresql() -> None:
    clusters = sorted(Path("/etc/postgresql").iterdir()) if Path("/etc/postgresql").is_dir() else []
    assert shutil.which("pg_ctlcluster") and clusters and os.geteuid() == 0, (
        "this test restarts the local PostgreSQL cluster: it needs root and pg_ctlcluster (Debian's postgresql-common)"
    )
    subprocess.run(  # noqa: S603 (fixed arguments)
        ["pg_ctlcluster", "--skip-systemctl-redirect", clusters[-1].name, "main", "restart"],  # noqa: S607
        check=True,
        capture_output=True,
        timeout=60,
    )


def server_started_at(database_url: str) -> Any:
    connection = psycopg2.connect(database_url.replace("postgresql+psycopg2://", "postgresql://"))
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_postmaster_start_time()")
            return cursor.fetchone()[0]  # type: ignore[index]
    finally:
        connection.close()


def terminate_test_database_sessions(database_url: str) -> None:
    """Every other connection to the test database is cut, as a restart cuts them (others' databases on
    the same server are left alone)."""
    connection = psycopg2.connect(database_url.replace("postgresql+psycopg2://", "postgresql://"))
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            assert cursor.fetchone()[0] > 0  # type: ignore[index]
    finally:
        connection.close()


def test_no_request_fails_when_every_database_connection_is_cut(
    make_app: Any, offline_stripe: SandboxAccount, database_url: str
) -> None:
    """What a restart does to the pool, without stopping the server: safe on a shared server."""
    app: Flask = make_app()
    results, new_event_ids, settled_id = traffic_through(
        app, offline_stripe, terminate_test_database_sessions, database_url
    )
    assert_none_failed(app, results, new_event_ids, settled_id)


@pytest.mark.skipif(
    os.environ.get("LEDGERLINE_SHARED_POSTGRES") == "1",
    reason="LEDGERLINE_SHARED_POSTGRES=1: the PostgreSQL server is shared, so it is not restarted",
)
def test_no_request_fails_while_postgresql_restarts(
    make_app: Any, offline_stripe: SandboxAccount, database_url: str
) -> None:
    app: Flask = make_app()
    before = server_started_at(database_url)
    results, new_event_ids, settled_id = traffic_through(
        app, offline_stripe, lambda _: restart_postgresql(), database_url
    )
    assert server_started_at(database_url) != before, "PostgreSQL did not restart"
    assert_none_failed(app, results, new_event_ids, settled_id)


Result = tuple[str, float, int]
KINDS = ("page", "billing page", "new webhook", "duplicate webhook", "sign-in")
EXPECTED = {"page": 200, "billing page": 200, "new webhook": 200, "duplicate webhook": 200, "sign-in": 303}


def traffic_through(
    app: Flask, offline_stripe: SandboxAccount, disrupt: Any, database_url: str
) -> tuple[list[Result], list[str], str]:
    """Four clients send signed-in pages, new webhooks and duplicates, and a fifth signs in over and
    over (a form that writes), while ``disrupt`` runs."""
    owner = app.test_client()
    sign_up(owner, offline_stripe)
    cookie = owner.get_cookie("session")
    assert cookie is not None
    # A duplicate to redeliver, settled before the restart.
    settled = stripe_event("customer.created", {"id": f"cus_{uuid.uuid4().hex[:14]}", "object": "customer"})
    assert post_webhook(owner, settled).status_code == 200

    results: list[tuple[str, float, int]] = []
    new_event_ids: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def traffic(worker: int) -> None:
        client = app.test_client()
        client.set_cookie("session", cookie.value)
        kinds = ["page", "billing page", "new webhook", "duplicate webhook"]
        if worker == len(KINDS) - 1:
            kinds = ["sign-in"]
            client = app.test_client()
            token = csrf_token(client, "/auth/login")
            form = {"csrf_token": token, "email": "ada@example.com", "password": PASSWORD}
        turn = worker
        while not stop.is_set():
            kind = kinds[turn % len(kinds)]
            turn += 1
            try:
                if kind == "sign-in":
                    status = client.post("/auth/login", data=form).status_code
                    # Signed out again, not counted (signing in gave the session a new CSRF token).
                    client.post("/auth/logout", data={"csrf_token": csrf_token(client, "/app")})
                    token = csrf_token(client, "/auth/login")
                    form["csrf_token"] = token
                elif kind == "page":
                    status = client.get("/app").status_code
                elif kind == "billing page":
                    status = client.get("/billing/").status_code
                elif kind == "new webhook":
                    event = stripe_event(
                        "customer.created", {"id": f"cus_{uuid.uuid4().hex[:14]}", "object": "customer"}
                    )
                    with lock:
                        new_event_ids.append(event["id"])
                    status = post_webhook(client, event).status_code
                else:
                    status = post_webhook(client, settled).status_code
            except Exception:  # an exception out of the app is a failed request too
                status = -1
            with lock:
                results.append((kind, time.monotonic(), status))

    workers = [threading.Thread(target=traffic, args=(n,)) for n in range(len(KINDS))]
    for worker in workers:
        worker.start()
    try:
        time.sleep(0.5)
        began = time.monotonic()
        disrupt(database_url)
        ended = time.monotonic()
        time.sleep(1.0)
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=60)
    with lock:
        results.append(("disruption", began, 0))
        results.append(("disruption", ended, 0))
    return results, new_event_ids, settled["id"]


def assert_none_failed(app: Flask, results: list[Result], new_event_ids: list[str], settled_id: str) -> None:
    began, ended = (at for kind, at, _ in results if kind == "disruption")
    results = [result for result in results if result[0] != "disruption"]
    failures = [(kind, status) for kind, _, status in results if status != EXPECTED[kind]]
    assert failures == [], f"{len(failures)} of {len(results)} requests failed: {Counter(failures)}"
    during = [kind for kind, at, _ in results if began <= at <= ended + 0.2]
    after = [kind for kind, at, _ in results if at > ended + 0.2]
    assert during and set(after) == set(KINDS), (len(during), Counter(after))
    # Every new event was stored exactly once; none was lost to the restart or doubled by a retry.
    stored = {row.event_id for row in query(app, "SELECT event_id FROM stripe_event")}
    assert stored == {*new_event_ids, settled_id}
    assert query(app, "SELECT count(*) AS n FROM stripe_event")[0].n == len(new_event_ids) + 1
    # Every sign-in was recorded once (plus the one after checkout): none lost, none doubled by a retry.
    sign_ins = sum(1 for kind, _, _ in results if kind == "sign-in")
    recorded = query(app, "SELECT count(*) AS n FROM domain_event WHERE name = 'user.signed_in'")[0].n
    assert recorded == sign_ins + 1, (recorded, sign_ins)
