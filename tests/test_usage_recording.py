"""Recording usage set-based (app/services/usage_store.py): a batch costs the same few statements
whatever its size, each idempotency key is counted once (across requests, within a batch, and between
concurrent batches), bad events are refused alone, and the counter always equals the stored events
(total and billable part); on PostgreSQL and on the SQLite stand-in of a development run."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import create_engine, event, text
from sqlalchemy.pool import NullPool

from app.extensions import db
from app.models import Organization
from app.services import queue, usage, usage_page, usage_reports
from app.services.billing_service import BillingService
from tests.conftest import SandboxAccount, csrf_token, query
from tests.test_usage import NOW, catalogue, frozen, organization  # noqa: F401 (frozen: a fixture)
from tests.test_usage_api import Owner, post_usage


def batch(app: Flask, org_id: int, events: list[dict[str, Any]]) -> list[usage.Recorded]:
    with app.app_context():
        return BillingService.record_usage_batch(org_id, events)


def event_of(key: str, quantity: Any = 10, **more: Any) -> dict[str, Any]:
    return {"meter": "api_calls", "quantity": quantity, "idempotency_key": key, **more}


PREPARED: list[str] = []  # the PREPAREs sent (once per statement and pooled connection: app/prepared.py)


@contextmanager
def statements(app: Flask) -> Iterator[list[str]]:
    """Every SQL statement the app sends meanwhile for the request itself (BEGIN and COMMIT are not
    statements here; a PREPARE, sent once per connection, goes to PREPARED)."""
    sent: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        (PREPARED if statement.startswith("PREPARE ") else sent).append(statement)

    with app.app_context():
        engine = db.engine
    event.listen(engine, "before_cursor_execute", count)
    try:
        yield sent
    finally:
        event.remove(engine, "before_cursor_execute", count)


def change(app: Flask, sql: str) -> None:
    with app.app_context():
        db.session.execute(text(sql))
        db.session.commit()


def consistent(app: Flask, org_id: int) -> tuple[int, int]:
    """The period's (total, billable) once the worker's tally has run, asserted equal to the sums over
    the stored events."""
    with app.app_context():
        BillingService.tally_usage()
    [counter] = query(app, "SELECT total, billable FROM usage_period_total WHERE organization_id = :o", o=org_id)
    [stored] = query(
        app,
        "SELECT coalesce(sum(quantity), 0) AS q, coalesce(sum(billable_quantity), 0) AS b FROM usage_event"
        " WHERE organization_id = :o",
        o=org_id,
    )
    assert (counter.total, counter.billable) == (stored.q, stored.b)
    return counter.total, counter.billable


def test_a_batch_costs_the_same_few_statements_whatever_its_size(app: Flask, frozen: None) -> None:  # noqa: F811
    app.extensions["plan_catalogue"] = catalogue(included=50)
    org_id = organization(app)
    with statements(app) as one:
        batch(app, org_id, [event_of("single")])
    with statements(app) as hundred:
        recorded = batch(app, org_id, [event_of(f"k{i}") for i in range(100)])
    assert all(isinstance(r, usage.RecordedUsage) and not r.duplicate for r in recorded)
    # The organization's read, then the insert of every event, in one statement: nothing is counted as
    # it is stored (the worker's tally counts), so nothing waits for another request's counter row.
    assert len(one) == len(hundred) == 2, hundred
    assert not any("usage_period_total" in sql for sql in hundred)
    assert not any("SAVEPOINT" in sql.upper() for sql in hundred)
    assert consistent(app, org_id) == (1010, 960)  # 50 included: the single event's 10 fit, then 40 of k0..k3


def test_the_api_records_a_batch_in_one_statement_with_a_remembered_key(
    app: Flask, offline_stripe: SandboxAccount
) -> None:
    owner = Owner(app, offline_stripe)
    key = owner.create_key("Worker")
    post_usage(app, key, event_of("warm"))  # the key's last use is written at most once a minute
    with statements(app) as sent:
        response = post_usage(app, key, {"events": [event_of(f"b{i}") for i in range(100)]})
    assert response.status_code == 200 and response.json["recorded"] == 100
    # The key and its organization were read by the first request and are remembered: the events'
    # insert (one statement, which also checks the key is still live) is all.
    assert len(sent) == 1, sent
    assert consistent(app, owner.organization_id)[0] == 1010
    with statements(app) as single:
        assert post_usage(app, key, event_of("one")).status_code == 201
    assert len(single) == 1, single
    assert single[0].startswith("EXECUTE usage_insert_one")  # planned once per connection, not per request
    PREPARED.clear()
    for n in range(5):
        with statements(app):
            assert post_usage(app, key, {"events": [event_of(f"again{n}-{i}") for i in range(3)]}).status_code == 200
    assert PREPARED == []  # the test client's requests share one pooled connection, prepared already


def test_a_remembered_key_revoked_or_an_organization_changed_is_noticed_at_once(
    app: Flask, offline_stripe: SandboxAccount
) -> None:
    owner = Owner(app, offline_stripe)
    key = owner.create_key("Worker")
    assert post_usage(app, key, event_of("a")).status_code == 201  # read, then remembered
    change(app, "UPDATE organization SET billing_status = 'canceled'")  # behind the process's back
    ended = post_usage(app, key, event_of("b"))
    assert ended.status_code == 402 and ended.json["error"]["code"] == "no_subscription"
    change(app, "UPDATE organization SET billing_status = 'active'")
    assert post_usage(app, key, {"events": [event_of("c")]}).json["recorded"] == 1
    [key_id] = [row.id for row in query(app, "SELECT id FROM api_key")]
    revoked = owner.client.post(
        f"/api-keys/{key_id}/revoke", data={"csrf_token": csrf_token(owner.client, "/api-keys/")}
    )
    assert revoked.status_code == 303
    refused = post_usage(app, key, {"events": [event_of("d"), event_of("e")]})
    assert refused.status_code == 401 and refused.json["error"]["code"] == "invalid_api_key"
    assert post_usage(app, key, event_of("f")).status_code == 401
    keys = [row.idempotency_key for row in query(app, "SELECT idempotency_key FROM usage_event ORDER BY id")]
    assert keys == ["a", "c"]
    assert consistent(app, owner.organization_id)[0] == 20


def test_repeated_keys_are_counted_once_across_requests_and_within_a_batch(app: Flask, frozen: None) -> None:  # noqa: F811
    app.extensions["plan_catalogue"] = catalogue(included=25)
    org_id = organization(app)
    [first] = batch(app, org_id, [event_of("a", 10)])
    results = batch(
        app,
        org_id,
        [event_of("a", 10), event_of("b", 10), event_of("b", 10), event_of("c", 10), event_of("b", 11)],
    )
    assert isinstance(first, usage.RecordedUsage)
    a, b, b_again, c, b_other = results
    assert isinstance(a, usage.RecordedUsage) and a.duplicate and a.event_id == first.event_id
    assert isinstance(b, usage.RecordedUsage) and not b.duplicate
    assert isinstance(b_again, usage.RecordedUsage) and b_again.duplicate and b_again.event_id == b.event_id
    assert isinstance(c, usage.RecordedUsage) and not c.duplicate
    assert isinstance(b_other, usage.UsageRejected) and b_other.code == "idempotency_key_reused"
    # a (10), b (10), c (10): 30 with 25 included; a repeat counted again would make it 40 (or 50).
    assert consistent(app, org_id) == (30, 5)
    rows = query(app, "SELECT idempotency_key, billable_quantity FROM usage_event ORDER BY idempotency_key")
    assert [(r.idempotency_key, r.billable_quantity) for r in rows] == [("a", 0), ("b", 0), ("c", 5)]


def test_a_batch_with_bad_events_stores_the_good_ones_and_the_counter_is_their_sum(
    app: Flask,
    frozen: None,  # noqa: F811
) -> None:
    app.extensions["plan_catalogue"] = catalogue(included=15)
    org_id = organization(app)
    batch(app, org_id, [event_of("seen", 4)])
    results = batch(
        app,
        org_id,
        [
            event_of("g1", 5),
            event_of("bad-quantity", -1),
            event_of("seen", 4),  # stored before: acknowledged, not counted
            {"meter": "storage", "quantity": 1, "idempotency_key": "bad-meter"},
            event_of("g2", 7),
            event_of("bad key"),
            event_of("g3", 9),
        ],
    )
    outcomes = [
        ("duplicate" if r.duplicate else "recorded") if isinstance(r, usage.RecordedUsage) else r.code for r in results
    ]
    assert outcomes == [
        "recorded",
        "invalid_quantity",
        "duplicate",
        "unknown_meter",
        "recorded",
        "invalid_idempotency_key",
        "recorded",
    ]
    # 4 + 5 + 7 + 9 = 25 with 15 included: 10 billable, split as the events came (g2: 1, g3: 9). The
    # batch was counted assuming "seen" was new, then corrected: its 4 are neither counted nor billed.
    assert consistent(app, org_id) == (25, 10)
    rows = query(app, "SELECT idempotency_key, billable_quantity FROM usage_event ORDER BY id")
    assert {r.idempotency_key: r.billable_quantity for r in rows} == {"seen": 0, "g1": 0, "g2": 1, "g3": 9}


def test_a_hard_limit_refuses_only_the_events_that_do_not_fit(app: Flask, frozen: None) -> None:  # noqa: F811
    app.extensions["plan_catalogue"] = catalogue("hard_limit", included=20)
    org_id = organization(app)
    batch(app, org_id, [event_of("before", 5)])
    results = batch(app, org_id, [event_of("x", 10), event_of("y", 10), event_of("before", 5), event_of("z", 5)])
    assert [type(r).__name__ for r in results] == [
        "RecordedUsage",
        "UsageLimitReached",
        "RecordedUsage",
        "RecordedUsage",
    ]
    refused = results[1]
    assert isinstance(refused, usage.UsageLimitReached) and refused.used == 15 and refused.limit == 20
    assert isinstance(results[2], usage.RecordedUsage) and results[2].duplicate
    assert consistent(app, org_id) == (20, 0)
    keys = {r.idempotency_key for r in query(app, "SELECT idempotency_key FROM usage_event")}
    assert keys == {"before", "x", "z"}


def test_concurrent_batches_with_overlapping_keys_count_each_key_once(make_app: Any, frozen: None) -> None:  # noqa: F811
    app = make_app()
    app.extensions["plan_catalogue"] = catalogue(included=1000)
    org_id = organization(app)
    outcomes: list[list[usage.Recorded]] = []
    errors: list[BaseException] = []

    def send(start: int) -> None:
        try:  # keys start..start+59: the two halves of each pair of batches share 20 keys
            outcomes.append(batch(app, org_id, [event_of(f"k{i}", 7) for i in range(start, start + 60)]))
        except BaseException as exc:  # pragma: no cover (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(start,)) for start in (0, 40, 80, 0, 40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(outcomes) == 5
    assert all(isinstance(r, usage.RecordedUsage) for results in outcomes for r in results)
    fresh = sum(not r.duplicate for results in outcomes for r in results if isinstance(r, usage.RecordedUsage))
    assert fresh == 140  # k0 .. k139, each stored by exactly one batch
    assert len(query(app, "SELECT id FROM usage_event")) == 140
    assert consistent(app, org_id) == (980, 0)


def test_concurrent_batches_past_what_is_included_bill_each_unit_once(make_app: Any, frozen: None) -> None:  # noqa: F811
    app = make_app()
    app.extensions["plan_catalogue"] = catalogue(included=100)
    org_id = organization(app)

    def send(start: int) -> None:
        batch(app, org_id, [event_of(f"k{i}", 3) for i in range(start, start + 50)])

    sending = [threading.Thread(target=send, args=(start,)) for start in (0, 25, 50, 75)]
    tallies: list[int] = []

    def tally() -> None:  # two workers' dispatch passes, tallying while the batches are stored
        while any(thread.is_alive() for thread in sending):
            with app.app_context():
                tallies.append(BillingService.tally_usage(once=True))

    tallying = [threading.Thread(target=tally) for _ in range(2)]
    for thread in (*sending, *tallying):
        thread.start()
    for thread in (*sending, *tallying):
        thread.join()
    # 125 distinct keys of 3: 375, of which 275 past the 100 included; every stored event's billable part
    # adds up to the period's, however the batches and the tallies interleaved (each event tallied once).
    assert consistent(app, org_id) == (375, 275)
    assert sum(tallies) <= 125 and len(query(app, "SELECT id FROM usage_event")) == 125


def test_a_batch_over_two_periods_keeps_each_counter_equal_to_its_events(app: Flask, frozen: None) -> None:  # noqa: F811
    app.extensions["plan_catalogue"] = catalogue(included=20)
    org_id = organization(app)
    last_period = (NOW - timedelta(days=30)).isoformat()  # before the current period began (Nov 20)
    batch(app, org_id, [event_of("old-1", 15, timestamp=last_period), event_of("new-1", 15)])
    with statements(app) as sent:
        results = batch(
            app,
            org_id,
            [
                event_of("new-2", 10),
                event_of("old-1", 15, timestamp=last_period),  # stored before: corrected out of the counter
                event_of("old-2", 10, timestamp=last_period),
                event_of("new-1", 15),
            ],
        )
    assert [r.duplicate for r in results if isinstance(r, usage.RecordedUsage)] == [False, True, False, True]
    # The organization, the insert, and, some events having been stored before, the read of the stored
    # events; the tally then counts each period apart, old-2 getting its billable part from old-1's total.
    assert len(sent) == 3, sent
    with app.app_context():
        BillingService.tally_usage()
    counters = query(
        app, "SELECT total, billable FROM usage_period_total WHERE organization_id = :o ORDER BY period_start", o=org_id
    )
    assert [(c.total, c.billable) for c in counters] == [(25, 5), (25, 5)]
    stored = query(
        app,
        "SELECT period_start, sum(quantity) AS q, sum(billable_quantity) AS b FROM usage_event"
        " GROUP BY period_start ORDER BY period_start",
    )
    assert [(s.q, s.b) for s in stored] == [(25, 5), (25, 5)]


def test_recording_works_the_same_on_the_sqlite_stand_in(sqlite_app: Flask, frozen: None) -> None:  # noqa: F811
    sqlite_app.extensions["plan_catalogue"] = catalogue(included=12)
    org_id = organization(sqlite_app)
    batch(sqlite_app, org_id, [event_of("a", 5)])
    results = batch(sqlite_app, org_id, [event_of("a", 5), event_of("b", 5), event_of("b", 5), event_of("c", -2)])
    assert [type(r).__name__ for r in results] == ["RecordedUsage", "RecordedUsage", "RecordedUsage", "UsageRejected"]
    assert [r.duplicate for r in results[:3] if isinstance(r, usage.RecordedUsage)] == [True, False, True]
    with statements(sqlite_app) as sent:
        [single] = batch(sqlite_app, org_id, [event_of("d", 4)])
    # The organization and the insert; then, the development run having no worker, the tally in the
    # same transaction: the untallied events, the period's upsert, and d's billable part (2 of 4).
    assert len(sent) == 5, sent
    assert isinstance(single, usage.RecordedUsage) and not single.duplicate
    assert consistent(sqlite_app, org_id) == (14, 2)
    sqlite_app.extensions["plan_catalogue"] = catalogue("hard_limit", included=12)
    [refused] = batch(sqlite_app, org_id, [event_of("e", 1)])
    assert isinstance(refused, usage.UsageLimitReached) and refused.used == 14


def test_the_usage_api_opens_no_session_and_runs_no_page_hooks(
    app: Flask, offline_stripe: SandboxAccount, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner = Owner(app, offline_stripe)
    key = owner.create_key("Worker")

    def refuse(*args: Any) -> Any:
        raise AssertionError("the usage API used page machinery")

    monkeypatch.setattr(app.session_interface, "open_session", refuse)
    monkeypatch.setattr(app.session_interface, "save_session", refuse)
    for registry in (app.before_request_funcs, app.after_request_funcs):
        for scope, hooks in list(registry.items()):
            monkeypatch.setitem(registry, scope, [refuse] * len(hooks))
    client = app.test_client()
    client.set_cookie("session", "a-session-id-from-a-browser")
    response = client.post("/api/v1/usage", json=event_of("a"), headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 201, response.get_data(as_text=True)
    assert "Set-Cookie" not in response.headers
    assert response.headers["X-Request-ID"] and response.headers["X-Content-Type-Options"] == "nosniff"


def test_the_usage_api_on_the_sqlite_stand_in(sqlite_app: Flask, offline_stripe: SandboxAccount) -> None:
    owner = Owner(sqlite_app, offline_stripe)
    key = owner.create_key("Worker")
    assert post_usage(sqlite_app, key, event_of("a", 5)).status_code == 201
    again = post_usage(sqlite_app, key, {"events": [event_of("a", 5), event_of("b", 6), event_of("b", 6)]})
    assert [r["outcome"] for r in again.json["results"]] == ["duplicate", "recorded", "duplicate"]
    assert consistent(sqlite_app, owner.organization_id)[0] == 11


def test_a_workers_dispatch_pass_tallies_what_was_stored(app: Flask, frozen: None) -> None:  # noqa: F811
    app.extensions["plan_catalogue"] = catalogue(included=10)
    org_id = organization(app)
    batch(app, org_id, [event_of("a", 6), event_of("b", 6)])
    assert query(app, "SELECT total FROM usage_period_total") == []  # stored, not counted yet
    assert [r.billable_quantity for r in query(app, "SELECT billable_quantity FROM usage_event")] == [None, None]
    with app.app_context():
        assert usage_reports.counts().untallied_events == 2  # what `flask billing status` shows ops
    queue.dispatch_now(app)  # a worker's pass, every WORKER_DISPATCH_SECONDS
    with app.app_context():
        assert usage_reports.counts().untallied_events == 0
    [period] = query(app, "SELECT total, billable FROM usage_period_total")
    assert (period.total, period.billable) == (12, 2)
    rows = query(app, "SELECT idempotency_key, billable_quantity FROM usage_event ORDER BY id")
    assert [(r.idempotency_key, r.billable_quantity) for r in rows] == [("a", 0), ("b", 2)]


def test_the_page_and_a_hard_limit_count_usage_not_tallied_yet(app: Flask, frozen: None) -> None:  # noqa: F811
    app.extensions["plan_catalogue"] = catalogue(included=10)
    org_id = organization(app)
    batch(app, org_id, [event_of("a", 8)])  # billed overage: stored, not tallied
    app.extensions["plan_catalogue"] = catalogue("hard_limit", included=10)  # the tier now hard-limits
    refused, accepted = batch(app, org_id, [event_of("b", 3), event_of("c", 2)])
    assert isinstance(refused, usage.UsageLimitReached) and refused.used == 8
    assert isinstance(accepted, usage.RecordedUsage) and not accepted.duplicate
    with app.app_context():
        organization_row = db.session.get(Organization, org_id)
        assert organization_row is not None
        [meter] = usage_page.meters_for(app.extensions["plan_catalogue"], organization_row, {}, NOW)
    assert meter.used == 10  # a (untallied) and c (counted by the hard limit)
    assert consistent(app, org_id) == (10, 0)


def test_a_connection_cut_after_preparing_is_prepared_again_on_the_next(
    app: Flask, offline_stripe: SandboxAccount
) -> None:
    owner = Owner(app, offline_stripe)
    key = owner.create_key("Worker")
    assert post_usage(app, key, event_of("before")).status_code == 201  # prepared on the pooled connection
    # Cut every other connection from one of our own: the pooled one dies with its prepared statement.
    outside = create_engine(app.config["SQLALCHEMY_DATABASE_URI"], poolclass=NullPool)
    with outside.begin() as connection:
        cut = connection.execute(
            text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        ).scalar_one()
    outside.dispose()
    assert cut >= 1
    PREPARED.clear()
    with statements(app):
        after = post_usage(app, key, event_of("after"))
    assert after.status_code == 201, after.get_data(as_text=True)  # the request ran again on a new connection
    assert [sql.split(" (")[0] for sql in PREPARED] == ["PREPARE usage_insert_one"]
    keys = [row.idempotency_key for row in query(app, "SELECT idempotency_key FROM usage_event ORDER BY id")]
    assert keys == ["before", "after"]
