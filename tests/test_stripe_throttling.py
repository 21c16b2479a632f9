"""Stripe's limits are kept across every worker (issue 20): a 429 from Stripe slows the applying side
only and spends no attempt, every process pauses for its Retry-After, and the request rate of all
processes together stays under STRIPE_REQUESTS_PER_SECOND (a token bucket in Redis)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from flask import Flask
from sqlalchemy import text

from app.extensions import db
from app.services.stripe_pace import MAX_PAUSE_SECONDS, Pace, for_app
from app.services.stripe_pace import retry_after as seconds_to_wait
from tests.conftest import TEST_USER_AGENT, SandboxAccount, post_webhook, query, run_jobs, sign_up, stripe_event


def arm_throttle(stripe_api: SandboxAccount, *, times: int = 1, retry_after: int | None = None) -> None:
    body: dict[str, Any] = {"method": "GET", "path_regex": "/v1/subscriptions/[^/]+", "kind": "rate_limit"}
    body.update(times=times, should_retry=False)
    if retry_after is not None:
        body["retry_after"] = retry_after
    stripe_api.http.post(f"{stripe_api.url}/_sandbox/faults", json=body, timeout=10).raise_for_status()


def subscription_reads(stripe_api: SandboxAccount) -> list[int]:
    """The status of each read of a subscription the app sent to the sandbox since the test began."""
    return [
        made["status"]
        for made in stripe_api.requests_made()
        if made["method"] == "GET"
        and made["path"].startswith("/v1/subscriptions/")
        and made["user_agent"] != TEST_USER_AGENT
    ]


@pytest.fixture
def throttled_app(make_app: Callable[..., Flask]) -> Flask:
    # One attempt: any failure of the job would mark the events failed at once.
    return make_app(JOB_MAX_ATTEMPTS=1)


def test_a_429_while_applying_keeps_the_events_pending_spends_no_attempt_and_applies_them_later(
    throttled_app: Flask, offline_stripe: SandboxAccount
) -> None:
    app = throttled_app
    client = app.test_client()
    subscription_id = sign_up(client, offline_stripe)["subscription"]
    run_jobs(app)
    offline_stripe.reset()
    past_due = offline_stripe.change_subscription(subscription_id, status="past_due")
    arm_throttle(offline_stripe, retry_after=1)

    delivered = stripe_event("customer.subscription.updated", past_due)
    assert post_webhook(client, delivered).status_code == 200
    run_jobs(app)

    sql = "SELECT status, attempts, last_error FROM stripe_event WHERE event_id = :id"
    [event] = query(app, sql, id=delivered["id"])
    assert (event.status, event.attempts) == ("pending", 1)  # not failed, though one attempt is the limit
    assert "throttled" in event.last_error
    [job] = query(
        app,
        "SELECT status, scheduled_at > now() AS later FROM procrastinate_jobs "
        "WHERE task_name = 'webhooks:apply' AND status = 'todo'",
    )
    assert job.later  # the object comes back after Stripe's Retry-After, not at once
    assert [row.status for row in query(app, "SELECT billing_status AS status FROM organization")] != ["past_due"]
    # Every process now holds its Stripe requests for Retry-After.
    with app.app_context():
        granted, seconds = Pace(10, app.extensions["redis"]).reserve(max_wait=0)
    assert not granted and 0 < seconds <= 1

    # Its time comes (the clock moved on): the same event is applied, with no error left.
    with app.app_context():
        db.session.execute(text("UPDATE procrastinate_jobs SET scheduled_at = now() WHERE status = 'todo'"))
        db.session.commit()
    time.sleep(1)
    run_jobs(app)
    [event] = query(app, sql, id=delivered["id"])
    assert (event.status, event.attempts, event.last_error) == ("processed", 1, None)
    [organization] = query(app, "SELECT billing_status FROM organization")
    assert organization.billing_status == "past_due"
    assert subscription_reads(offline_stripe) == [429, 200]


def test_the_shared_request_budget_holds_back_a_request_instead_of_sending_it(
    make_app: Callable[..., Flask], offline_stripe: SandboxAccount
) -> None:
    """With the budget used up and no time to wait for a turn, the read is not sent at all: the events
    wait, as they would for Stripe's own 429."""
    signed_up = make_app()
    subscription_id = sign_up(signed_up.test_client(), offline_stripe)["subscription"]
    run_jobs(signed_up)
    app = make_app(STRIPE_REQUESTS_PER_SECOND="0.2", STRIPE_RATE_WAIT_SECONDS=0, JOB_MAX_ATTEMPTS=1)
    client = app.test_client()
    for_app(app).reserve(max_wait=60)  # the bucket is empty for the next five seconds
    offline_stripe.reset()
    past_due = offline_stripe.change_subscription(subscription_id, status="past_due")
    delivered = stripe_event("customer.subscription.updated", past_due)
    assert post_webhook(client, delivered).status_code == 200
    run_jobs(app)

    assert subscription_reads(offline_stripe) == []  # never sent
    [event] = query(app, "SELECT status, last_error FROM stripe_event WHERE event_id = :id", id=delivered["id"])
    assert event.status == "pending" and "throttled" in event.last_error


def test_the_request_rate_of_all_processes_together_stays_under_the_setting(redis_url: str) -> None:
    shared = redis.Redis.from_url(redis_url)
    shared.delete("pace-test:bucket", "pace-test:pause")
    per_second, requests_each = 20.0, 15
    processes = [Pace(per_second, redis.Redis.from_url(redis_url), key="pace-test") for _ in range(3)]
    sent: list[float] = []
    lock = threading.Lock()

    def worker(pace: Pace) -> None:
        for _ in range(requests_each):
            assert pace.take(max_wait=10) is None
            with lock:
                sent.append(time.monotonic())

    threads = [threading.Thread(target=worker, args=(pace,)) for pace in processes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    sent.sort()
    # 45 requests at 20/s with a burst of 5: at least (45 - 5) / 20 = 2 s, and no second holds more
    # than the rate plus the burst.
    assert sent[-1] - sent[0] >= (len(sent) - processes[0].burst) / per_second - 0.05
    for start in sent:
        assert sum(1 for at in sent if start <= at < start + 1) <= per_second + processes[0].burst + 1


def test_a_pause_set_by_one_process_holds_every_process(redis_url: str) -> None:
    shared = redis.Redis.from_url(redis_url)
    shared.delete("pace-test:bucket", "pace-test:pause")
    throttled, other = (Pace(50, redis.Redis.from_url(redis_url), key="pace-test") for _ in range(2))
    throttled.pause(2)
    granted, seconds = other.reserve(max_wait=0.5)
    assert not granted and 1.5 < seconds <= 2
    started = time.monotonic()
    assert other.take(max_wait=3) is None  # waits out the pause, then goes
    assert 1.4 < time.monotonic() - started < 2.5


def test_retry_after_is_read_in_seconds_or_as_a_date() -> None:
    assert seconds_to_wait({"retry-after": "3"}) == 3
    assert seconds_to_wait({"Retry-After": "Thu, 01 Jan 1970 00:00:00 GMT"}) == 0
    assert seconds_to_wait({"Retry-After": "soon"}) is None
    assert seconds_to_wait({"Retry-After": "100000"}) == MAX_PAUSE_SECONDS
    assert seconds_to_wait(None) is None


def test_acknowledging_is_not_slowed_by_a_throttled_stripe(
    make_app: Callable[..., Flask], offline_stripe: SandboxAccount
) -> None:
    app = make_app()
    client = app.test_client()
    with app.app_context():
        for_app(app).pause(60)
        db.session.remove()
    started = time.monotonic()
    for _ in range(5):
        event = stripe_event("customer.subscription.updated", {"id": "sub_elsewhere", "object": "subscription"})
        assert post_webhook(client, event).status_code == 200
    assert time.monotonic() - started < 2


def test_with_redis_unreachable_each_process_keeps_the_budget_itself_without_waiting_on_redis() -> None:
    unreachable = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    pace = Pace(2, unreachable, key="pace-test")
    assert pace.reserve(max_wait=0) == (True, 0.0)  # Redis fails (after its retries): this process decides
    started = time.monotonic()
    assert pace.reserve(max_wait=0)[0] is False  # burst of 1 at 2/s: the next turn is 0.5 s away
    pace.pause(0)
    assert time.monotonic() - started < 0.1  # Redis is not asked again for a while


def test_the_worker_takes_its_turn_before_collecting_so_what_arrives_while_it_waits_joins_the_read(
    make_app: Callable[..., Flask], offline_stripe: SandboxAccount, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker waiting for its turn to read Stripe holds no batch: the events about the object that
    arrive while it waits are applied by the same read, and the turn it took is the one the read
    spends (one turn, one read)."""
    app = make_app()
    client = app.test_client()
    subscription_id = sign_up(client, offline_stripe)["subscription"]
    run_jobs(app)
    offline_stripe.reset()
    past_due = offline_stripe.change_subscription(subscription_id, status="past_due")
    first = stripe_event("customer.subscription.updated", past_due)
    second = stripe_event("customer.subscription.updated", past_due)
    pace = for_app(app)
    take = pace.take
    turns: list[float] = []

    def slow_turn(max_wait: float) -> float | None:
        turns.append(max_wait)
        if len(turns) == 1:  # while the worker waits for its turn, another delivery about the object arrives
            assert post_webhook(app.test_client(), second).status_code == 200
            time.sleep(0.1)  # it waited
        return take(max_wait)

    monkeypatch.setattr(pace, "take", slow_turn)
    assert post_webhook(client, first).status_code == 200
    run_jobs(app)

    sql = "SELECT status FROM stripe_event WHERE event_id IN (:a, :b)"
    assert [row.status for row in query(app, sql, a=first["id"], b=second["id"])] == ["processed", "processed"]
    assert subscription_reads(offline_stripe) == [200]  # both applied from one read
    assert len(turns) == 1  # the read spent the turn taken before collecting
    [organization] = query(app, "SELECT billing_status FROM organization")
    assert organization.billing_status == "past_due"
